"""Builds the optional C tokenizer; pyproject.toml holds everything else.

`runtime._tokenizer_c` is optional: where it does not compile (no C compiler
on the device), the install still succeeds and `runtime.Tokenizer` uses the
pure-Python twin. Its Unicode tables are generated first, by the interpreter
being built for (see runtime/_gen_tables.py).
"""

import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name != "runtime._tokenizer_c":
            return super().build_extension(ext)
        header_dir = Path(self.build_temp).resolve() / "generated"
        header = header_dir / "_tokenizer_tables.h"
        command = [sys.executable, str(ROOT / "runtime" / "_gen_tables.py"), str(header)]
        try:
            subprocess.run(command, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            # A CompileError, so that `optional=True` turns it into a warning too.
            raise CompileError(f"generating {header.name} failed: {e}") from e
        ext.include_dirs.append(str(header_dir))
        ext.depends.append(str(header))
        super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "runtime._tokenizer_c",
            sources=["runtime/_tokenizer_c.c"],
            depends=["runtime/_gen_tables.py", "runtime/_tokenizer_py.py"],
            # -pthread: encode_batch runs big batches on POSIX threads (none on Windows).
            extra_compile_args=["-O2", "-pthread"] if sys.platform != "win32" else ["/O2"],
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            optional=True,
        ),
        Extension(
            "runtime._kernels",
            sources=["runtime/_kernels.c"],
            depends=["runtime/_q4_math.h"],
            # the vector paths are compiled per function (target attributes) and chosen
            # at run time, so the library itself needs no -march
            extra_compile_args=["-O2"] if sys.platform != "win32" else ["/O2"],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": BuildExt},
)
