"""`/v1/files`: the OpenAI Files API for batch input, kept in the batch spool.

Responsible for: uploads (multipart, `purpose=batch`, JSONL) validated line by line before any job can see
them (a bad line is a 400 naming its number, an oversize upload a 413); listing, retrieving, reading and
deleting a key's own files (another key's are a 404, as if absent); the spool folder itself (0700, files 0600,
owned by the service); the files a batch job writes back (output and error files) read through the same API.
Metadata lives in a JSON file next to each file, so that every gateway worker of a tier, and the controller,
see the same files without sharing memory.

Not responsible for: batches (controller/batches.py); running the lines (slinfer/batchrun.py); authenticating
the key (the gateway's KeyStore verifies it and hands this module the KeyInfo).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import BodyPartReader, web

from slinfer.atomicfile import write_atomic
from slinfer.config import Config
from slinfer.controller.keys import KeyInfo

# The endpoints a batch line may name, and the body field each needs beside `model` (vLLM's run_batch
# aborts its whole run on a line without it, so the upload refuses it).
BATCH_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
# Purposes an upload may give; the others (batch_output) are the batch jobs' own files.
UPLOAD_PURPOSES = frozenset({"batch"})
# A file id is `file-` and this many random hex digits: unguessable, and safe as a file name.
_ID_HEX = 24
_ID = re.compile(rf"^file-[0-9a-f]{{{_ID_HEX}}}$")
# Uploads are read in chunks of this size, so that an oversize one is cut at its limit, not read whole.
_CHUNK = 1 << 20


class BadLine(ValueError):
    """A batch input line that no job could run: its 1-based number and why."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


def spool_dir(config: Config) -> Path:
    """`[batch].spool`, or `<controller.state_dir>/batch` when it is empty."""
    return Path(config.batch.spool or os.path.join(config.controller.state_dir, "batch"))


def check_batch_line(raw: bytes, number: int, models: Collection[str], seen: set[str]) -> dict[str, object]:
    """One JSONL line as a batch request, or BadLine; adds its custom_id to `seen` (ids must be unique)."""
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadLine(number, "is not valid JSON") from None
    if not isinstance(line, dict):
        raise BadLine(number, "is not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(number, "has no custom_id (a non-empty string)")
    if custom_id in seen:
        raise BadLine(number, f"repeats custom_id {custom_id[:64]!r}")
    if line.get("method") != "POST":
        raise BadLine(number, "method must be POST")
    url = line.get("url")
    if url not in BATCH_URLS:
        raise BadLine(number, f"url must be one of {', '.join(BATCH_URLS)}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise BadLine(number, "body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        raise BadLine(number, f"body.model {str(model)[:64]!r} is not a model of this service")
    if BATCH_URLS[url] not in body:
        raise BadLine(number, f"body has no {BATCH_URLS[url]}")
    if body.get("stream"):
        raise BadLine(number, "body.stream is not allowed in a batch")
    seen.add(custom_id)
    return line


def check_batch_file(data: bytes, models: Collection[str], max_lines: int) -> tuple[int, set[str]]:
    """(lines, models named) of a valid batch file, or BadLine for the first bad line; one model per file."""
    seen: set[str] = set()
    named: set[str] = set()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line
    if not lines:
        raise BadLine(1, "the file is empty")
    if len(lines) > max_lines:
        raise BadLine(max_lines + 1, f"the file has more than [batch].max_lines ({max_lines}) lines")
    for number, raw in enumerate(lines, 1):
        line = check_batch_line(raw, number, models, seen)
        named.add(str(line["body"]["model"]))  # type: ignore[index]
        if len(named) > 1:
            raise BadLine(number, "names a second model: a batch runs one model (split the file)")
    return len(lines), named


@dataclass
class FileMeta:
    """A file's OpenAI object, and whose it is."""

    id: str
    owner: str  # the key id that uploaded it (or whose batch wrote it)
    filename: str
    bytes: int
    created_at: int
    purpose: str
    lines: int = 0
    model: str = ""

    def public(self) -> dict[str, object]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


class FileStore:
    """The spool's files: `<id>.jsonl` and its `<id>.json` metadata, written atomically."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.root = spool / "files"

    def ensure(self) -> None:
        """Makes the spool (0700) at the first write: a gateway that never stores a file needs no folder."""
        for folder in (self.spool, self.root):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)

    @staticmethod
    def new_id() -> str:
        return "file-" + secrets.token_hex(_ID_HEX // 2)

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):
            raise KeyError(file_id)
        return self.root / f"{file_id}.jsonl"

    def _meta_path(self, file_id: str) -> Path:
        return self.path(file_id).with_suffix(".json")

    def put(self, meta: FileMeta, data: bytes | None = None) -> None:
        """Records `meta`; writes `data` as the file's content if given (else the content is already there)."""
        self.ensure()
        if data is not None:
            write_atomic(self.path(meta.id), data)
        write_atomic(self._meta_path(meta.id), json.dumps(asdict(meta)).encode())

    def get(self, file_id: str, owner: str) -> FileMeta | None:
        """The file, if it exists and is `owner`'s; None otherwise (another key's file is as absent)."""
        try:
            meta = FileMeta(**json.loads(self._meta_path(file_id).read_bytes()))
        except (KeyError, OSError, ValueError, TypeError):
            return None
        return meta if secrets.compare_digest(meta.owner, owner) else None

    def list(self, owner: str) -> Iterator[FileMeta]:
        for entry in sorted(self.root.glob("file-*.json")):
            meta = self.get(entry.stem, owner)
            if meta is not None:
                yield meta

    def delete(self, file_id: str, owner: str) -> bool:
        if self.get(file_id, owner) is None:
            return False
        self._meta_path(file_id).unlink(missing_ok=True)
        self.path(file_id).unlink(missing_ok=True)
        return True


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": code}}, status=status)


class FilesApi:
    """The `/v1/files` routes, for a gateway's router."""

    def __init__(self, store: FileStore, verify: Callable[[str], KeyInfo | None], models: Collection[str],
                 max_file_bytes: int, max_lines: int,
                 verify_late: Callable[[str], Awaitable[KeyInfo | None]] | None = None) -> None:
        self.store = store
        self._verify = verify
        # A tier worker's wait for a key the feed has not brought yet (keywait.KeyWait.verify): a key made a moment
        # ago works here as it does for chat.
        self._verify_late = verify_late
        self._models = frozenset(models)
        self._max_bytes = max_file_bytes
        self._max_lines = max_lines

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self._upload)
        router.add_get("/v1/files", self._list)
        router.add_get("/v1/files/{file_id}", self._retrieve)
        router.add_get("/v1/files/{file_id}/content", self._content)
        router.add_delete("/v1/files/{file_id}", self._delete)

    async def key(self, request: web.Request) -> KeyInfo | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        if self._verify_late is not None:
            return await self._verify_late(token.strip())
        return self._verify(token.strip())

    def _unauthorized(self) -> web.Response:
        return web.json_response({"error": {"message": "Invalid or missing API key.", "type": "invalid_request_error",
                                            "param": None, "code": "invalid_api_key"}}, status=401)

    def _too_large(self) -> web.Response:
        return _error(413, f"The file is larger than [batch].max_file_bytes ({self._max_bytes} bytes).",
                      "file_too_large")

    async def _upload(self, request: web.Request) -> web.Response:
        key = await self.key(request)
        if key is None:
            return self._unauthorized()
        if request.content_length is not None and request.content_length > self._max_bytes + _CHUNK:
            return self._too_large()  # the multipart framing is small: no need to read a body this large
        if not request.content_type.startswith("multipart/"):
            return _error(400, "Upload a file as multipart/form-data with fields 'purpose' and 'file'.")
        purpose, filename, data = "", "", bytearray()
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: no field of ours
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                while chunk := await part.read_chunk(_CHUNK):
                    data += chunk
                    if len(data) > self._max_bytes:
                        return self._too_large()
            else:
                await part.release()
        if purpose not in UPLOAD_PURPOSES:
            return _error(400, f"purpose must be 'batch', not {purpose[:32]!r}", param="purpose")
        if not filename:
            return _error(400, "No 'file' field in the upload.", param="file")
        try:
            lines, named = check_batch_file(bytes(data), self._models, self._max_lines)
        except BadLine as exc:
            return _error(400, f"Line {exc.line} of the file is not a valid batch request: {exc.problem}",
                          "invalid_batch_line", param=f"line {exc.line}")
        meta = FileMeta(id=FileStore.new_id(), owner=key.key_id, filename=os.path.basename(filename)[:255],
                        bytes=len(data), created_at=int(time.time()), purpose=purpose, lines=lines,
                        model=next(iter(named)))
        self.store.put(meta, bytes(data))
        return web.json_response(meta.public())

    async def _list(self, request: web.Request) -> web.Response:
        key = await self.key(request)
        if key is None:
            return self._unauthorized()
        purpose = request.query.get("purpose")
        data = [m.public() for m in self.store.list(key.key_id) if purpose in (None, m.purpose)]
        data.sort(key=lambda f: (-int(f["created_at"]), str(f["id"])))  # type: ignore[call-overload]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def _own(self, request: web.Request) -> tuple[KeyInfo | None, FileMeta | None, web.Response | None]:
        key = await self.key(request)
        if key is None:
            return None, None, self._unauthorized()
        file_id = request.match_info["file_id"]
        meta = self.store.get(file_id, key.key_id)
        if meta is None:
            return key, None, _error(404, f"No such File object: {file_id[:64]}", "not_found", "id")
        return key, meta, None

    async def _retrieve(self, request: web.Request) -> web.Response:
        _, meta, refused = await self._own(request)
        if refused is not None or meta is None:
            return refused or _error(404, "not found")
        return web.json_response(meta.public())

    async def _content(self, request: web.Request) -> web.StreamResponse:
        _, meta, refused = await self._own(request)
        if refused is not None or meta is None:
            return refused or _error(404, "not found")
        return web.FileResponse(self.store.path(meta.id), headers={"Content-Type": "application/jsonl"})

    async def _delete(self, request: web.Request) -> web.Response:
        key, meta, refused = await self._own(request)
        if refused is not None or meta is None or key is None:
            return refused or _error(404, "not found")
        self.store.delete(meta.id, key.key_id)
        return web.json_response({"id": meta.id, "object": "file", "deleted": True})


def batch_routes(config: Config, verify: Callable[[str], KeyInfo | None],
                 verify_late: Callable[[str], Awaitable[KeyInfo | None]] | None = None,
                 ) -> list[Callable[[web.UrlDispatcher], None]]:
    """The batch APIs' route registrations for a gateway (controller's or a tier worker's), on the spool."""
    from slinfer.controller.batches import BatchesApi, BatchStore  # batches builds on this module

    spool = spool_dir(config)
    models = [m.name for m in config.models]
    files = FilesApi(FileStore(spool), verify, models, config.batch.max_file_bytes, config.batch.max_lines,
                     verify_late=verify_late)
    batches = BatchesApi(BatchStore(spool), files.store, files.key, models)
    return [files.register, batches.register]
