"""Build statecore: the C core in csrc/ plus the Cython bindings in statecore/.

The C core is compiled as a static library with strict flags (-Wall -Wextra
-Werror: zero warnings from our own C); Cython's generated C gets -O3 -Wall.
Environment switches:

* ``STATECORE_DEBUG=1``: -O0 -g, assertions on.
* ``STATECORE_SANITIZE=1``: AddressSanitizer + UndefinedBehaviorSanitizer
  with -fno-sanitize-recover=all and -fno-wrapv; see CONTRIBUTING.md for how to run the
  tests under it (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``) and under valgrind.
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("STATECORE_DEBUG") == "1"
SANITIZE = os.environ.get("STATECORE_SANITIZE") == "1"

opt = ["-O0", "-g"] if DEBUG or SANITIZE else ["-O3"]
# -fno-sanitize-recover=all: every UBSan finding aborts (by default UBSan prints and goes on).
# -fno-wrapv: Python's own CFLAGS carry -fwrapv, which makes signed overflow defined and so
# switches UBSan's signed-integer-overflow check off; the sanitizer build wants it on.
san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if SANITIZE else []
san_cflags = san + ["-fno-wrapv"] if SANITIZE else []
core_flags = ["-std=c11", "-Wall", "-Wextra", "-Werror"] + opt + san_cflags
ext_flags = ["-Wall", "-Wno-unused-function"] + opt + san_cflags
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if not DEBUG:
    macros.append(("NDEBUG", None))

CORE_SOURCES = ["csrc/sc_hash.c", "csrc/sc_buf.c", "csrc/sc_keycodec.c", "csrc/sc_table.c"]

libraries = [("sccore", {"sources": CORE_SOURCES, "include_dirs": ["csrc"], "cflags": core_flags})]


def ext(name):
    return Extension(
        f"statecore.{name}",
        [f"statecore/{name}.pyx"],
        include_dirs=["csrc", numpy.get_include()],
        define_macros=macros,
        extra_compile_args=ext_flags,
        extra_link_args=san,
        libraries=["sccore"],
        # The C core is a static library: relink (and recompile, for the headers) when it changes.
        depends=sorted(glob.glob("csrc/*.c") + glob.glob("csrc/*.h")),
    )


extensions = cythonize(
    [ext("_codec"), ext("_core"), ext("_sink"), ext("_tables"), ext("_states"), ext("_lmdb")],
    compiler_directives={"language_level": 3, "embedsignature": True, "binding": True},
    include_path=["."],
)



class BuildExt(build_ext):
    """Build the C core library first, also for ``build_ext --inplace`` and editable installs."""

    def run(self):
        self.run_command("build_clib")
        super().run()


setup(libraries=libraries, ext_modules=extensions, cmdclass={"build_ext": BuildExt})
