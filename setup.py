"""Build hook: generate the protobuf/gRPC stubs before packaging (they are never committed)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("dsec_codegen", Path(__file__).parent / "dsec" / "codegen.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(force=True)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
