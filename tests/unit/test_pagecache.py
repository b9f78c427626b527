"""Page-cache read-ahead: a `readahead` model's files end up resident, a model this node does not serve or that
would crowd out its memory is skipped with the numbers, one model is read at a time, and a job's start reads
its model beside the engine. Residency is what the kernel says (util-linux's `fincore`), after the test has
evicted the files itself; a file the kernel would not evict makes the test fail as inconclusive."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.readahead import evict, resident_bytes
from slinfer.agent import pagecache
from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.pagecache import PageCacheWarmer
from slinfer.agent.records import RecordStore
from slinfer.config import AgentConfig, Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

MB = 1 << 20


def _model_dir(root: Path) -> tuple[Path, list[Path]]:
    """A model folder as a site has one: weights, a config, and a tokenizer one folder down."""
    folder = root / "model"
    (folder / "tokenizer").mkdir(parents=True)
    files = [folder / "model.safetensors", folder / "config.json", folder / "tokenizer" / "tokenizer.json"]
    for path, size in zip(files, (3 * MB, 4096, MB), strict=True):
        with open(path, "wb") as out:
            out.write(os.urandom(size))
            out.flush()
            os.fsync(out.fileno())  # clean pages: only those can be evicted
    return folder, files


def _resident(path: Path) -> int:
    return resident_bytes([path])


def _evict(paths: list[Path]) -> None:
    try:
        evict(paths)
    except RuntimeError as exc:
        pytest.fail(str(exc))


async def test_a_models_files_are_read_into_the_page_cache(tmp_path: Path) -> None:
    folder, files = _model_dir(tmp_path)
    _evict(files)
    result = await PageCacheWarmer().read_ahead(ModelConfig(name="m", source=str(folder), readahead=True), "test")
    assert result is not None
    assert (result.files, result.bytes) == (3, sum(p.stat().st_size for p in files))
    for path in files:
        assert _resident(path) == path.stat().st_size, f"{path.name} is not resident after the read-ahead"


async def test_a_source_of_one_file_and_a_linked_blob_are_read(tmp_path: Path) -> None:
    _, files = _model_dir(tmp_path)
    # A hub cache's snapshot folder holds links to its blobs; the blob is what has to be resident.
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(files[0])
    _evict(files)
    warmer = PageCacheWarmer()
    linked = await warmer.read_ahead(ModelConfig(name="m", source=str(snapshot)), "test")
    assert linked is not None and linked.bytes == 3 * MB
    assert _resident(files[0]) == 3 * MB
    single = await warmer.read_ahead(ModelConfig(name="m", source=str(files[2])), "test")
    assert single is not None and (single.files, single.bytes) == (1, MB)


async def test_a_hub_id_or_a_path_missing_here_is_skipped_with_why(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=pagecache.__name__)
    warmer = PageCacheWarmer()
    assert await warmer.read_ahead(ModelConfig(name="hub", source="HuggingFaceTB/SmolLM2-135M"), "test") is None
    assert await warmer.read_ahead(ModelConfig(name="gone", source=str(tmp_path / "nowhere")), "test") is None
    assert "model hub: no read-ahead (test): its source 'HuggingFaceTB/SmolLM2-135M' is no file or folder" \
        in caplog.text
    assert "model gone: no read-ahead" in caplog.text


async def test_a_model_larger_than_half_the_available_memory_is_skipped(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=pagecache.__name__)
    folder, files = _model_dir(tmp_path)
    size = sum(p.stat().st_size for p in files)
    model = ModelConfig(name="big", source=str(folder))
    assert await PageCacheWarmer(memory=lambda: 2 * size - 2).read_ahead(model, "test") is None
    assert f"its 3 files hold {size / 1e9:.2f} GB, more than 50% of the {(2 * size - 2) / 1e9:.2f} GB" in caplog.text
    assert await PageCacheWarmer(memory=lambda: 2 * size).read_ahead(model, "test") is not None


async def test_an_unreadable_file_is_logged_and_never_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = _model_dir(tmp_path)

    def refuse(paths: list[Path]) -> int:
        raise PermissionError(13, "Permission denied", str(paths[0]))

    monkeypatch.setattr(pagecache, "read_files", refuse)
    assert await PageCacheWarmer().read_ahead(ModelConfig(name="m", source=str(folder)), "test") is None
    assert "model m: read-ahead (test) failed: [Errno 13] Permission denied" in caplog.text


async def test_models_are_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = _model_dir(tmp_path)
    reading, most = 0, 0
    real = pagecache.read_files

    def counted(paths: list[Path]) -> int:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        try:
            return real(paths)
        finally:
            reading -= 1

    monkeypatch.setattr(pagecache, "read_files", counted)
    warmer = PageCacheWarmer()
    results = await asyncio.gather(*(warmer.read_ahead(ModelConfig(name=f"m{i}", source=str(folder)), "test")
                                     for i in range(4)))
    assert all(r is not None for r in results)
    assert most == 1, f"{most} reads ran at once"


async def test_the_agent_start_reads_only_readahead_models_this_node_serves(tmp_path: Path) -> None:
    folder, _ = _model_dir(tmp_path)
    models = [ModelConfig(name="here", source=str(folder), readahead=True, partition="gpu"),
              ModelConfig(name="elsewhere", source=str(folder), readahead=True, partition="big"),
              ModelConfig(name="not-asked", source=str(folder)),
              ModelConfig(name="anywhere", source=str(folder), readahead=True)]
    warmer = PageCacheWarmer()
    assert [r.model for r in await warmer.read_catalog(models, ["gpu", "debug"])] == ["here", "anywhere"]
    # Slurm did not answer: no partition is known, so every model that asks is read.
    assert [r.model for r in await warmer.read_catalog(models, [])] == ["here", "elsewhere", "anywhere"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_jobs_start_reads_its_readahead_model_beside_the_engine(tmp_path: Path,
                                                                       http: aiohttp.ClientSession) -> None:
    folder, files = _model_dir(tmp_path)
    engine = tmp_path / "engine"
    engine.write_text("#!/bin/sh\nexec sleep 30\n")
    engine.chmod(0o755)
    agent = AgentConfig(address="127.0.0.1", engine_command=[str(engine)], run_dir=str(tmp_path / "run"),
                        warm_start=False, stop_grace_s=1.0)
    models = [ModelConfig(name="ahead", source=str(folder), readahead=True),
              ModelConfig(name="plain", source=str(folder))]
    manager = EngineManager(Config(agent=agent, models=models), RecordStore(tmp_path / "run" / "engines"), http,
                            Gpus(), pagecache=PageCacheWarmer())
    _evict(files)
    try:
        for job_id, model in (("201", "ahead"), ("202", "plain")):
            started = await manager.start(pb.JobSpec(job_id=job_id, model=model, uid=os.getuid(), gid=os.getgid(),
                                                     user="", gpus=["0"]))
            assert started.state == pb.STARTING, started
        reading = manager._engines["201"].reading
        assert reading is not None, "the readahead model's job read nothing ahead"
        result = await asyncio.wait_for(reading, 30)
        assert result is not None and result.bytes == sum(p.stat().st_size for p in files)
        assert _resident(files[0]) == files[0].stat().st_size
        assert manager._engines["202"].reading is None, "a model without readahead was read"
    finally:
        for job_id in ("201", "202"):
            assert (await manager.stop(job_id)).clean
        await manager.close()
