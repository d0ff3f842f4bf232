"""Build steps that pyproject.toml cannot declare: the Cython extensions and the gRPC stubs.

- Every module in relay_server/_fast/ that has a .pxd beside it is compiled by Cython in
  pure-Python mode; the .py stays importable as the plain implementation's source of truth.
- The stubs for proto/**/*.proto are generated into relay_server/api/ at build time (never
  committed), with the import prefix `relay_server.api` so the package needs no path tricks.
"""

from __future__ import annotations

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
API_PACKAGE = "relay_server/api"


def fast_modules() -> list[str]:
    return sorted(str(pxd.with_suffix(".py").relative_to(ROOT)) for pxd in (ROOT / "relay_server/_fast").glob("*.pxd"))


class GenerateStubs(Command):
    description = "generate gRPC stubs from proto/ into relay_server/api/"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
        if not protos:
            return
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{API_PACKAGE}={PROTO_ROOT.relative_to(ROOT)}",
            f"-I{well_known}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {protos}")
        # Make every generated directory a regular package.
        for directory in [ROOT / API_PACKAGE, *(ROOT / API_PACKAGE).rglob("*")]:
            if directory.is_dir():
                (directory / "__init__.py").touch()


class BuildPy(build_py):
    def run(self) -> None:
        self.run_command("generate_stubs")
        # Packages were listed before the stubs existed; list them again.
        self.packages = sorted({*self.packages, *self._api_packages()})
        super().run()

    @staticmethod
    def _api_packages() -> list[str]:
        return [str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / API_PACKAGE).rglob("__init__.py")]


setup(
    ext_modules=cythonize(
        fast_modules(),
        compiler_directives={"language_level": "3", "binding": False, "boundscheck": False, "wraparound": False},
        quiet=True,
    ),
    cmdclass={"generate_stubs": GenerateStubs, "build_py": BuildPy},
)
