"""Compiles proto/ into slinfer.v1 at build time, so that no generated code is kept in git."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    (ROOT / "slinfer" / "v1" / "__init__.py").touch()


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


# Also at configuration time: setuptools checks that package directories exist before build_py runs,
# and editable installs never run build_py.
compile_protos()
setup(cmdclass={"build_py": BuildWithProtos})
