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

# LMDB (csrc/lmdb/: py-lmdb's patched LMDB 0.9.x, vendored; see csrc/lmdb/README) is third-party code, built
# as its own static library and linked only into statecore._mdb (one copy of LMDB in the process; statecore._lmdb
# reaches it through _mdb's C-level functions).  Not our -Wall -Wextra -Werror: upstream LMDB is not
# warning-clean under them (unused parameters, sign comparisons, fallthroughs), and we do not patch
# third-party code to silence warnings, so -w keeps the build output at zero warnings.  -UNDEBUG: LMDB's own
# assertions stay on, as in py-lmdb's build.  -fvisibility=hidden: its mdb_* symbols are not exported from
# our extension module (no interposition with another LMDB loaded in the process).  The sanitizer flags
# apply to it too.
LMDB_SOURCES = ["csrc/lmdb/mdb.c", "csrc/lmdb/midl.c"]
lmdb_flags = ["-w", "-UNDEBUG", "-fvisibility=hidden", "-pthread"] + (["-O0", "-g"] if DEBUG or SANITIZE else ["-O2"]) \
    + san_cflags

libraries = [("sccore", {"sources": CORE_SOURCES, "include_dirs": ["csrc"], "cflags": core_flags}),
             ("sclmdb", {"sources": LMDB_SOURCES, "include_dirs": ["csrc/lmdb"], "cflags": lmdb_flags})]


def ext(name, libs=("sccore",)):
    return Extension(
        f"statecore.{name}",
        [f"statecore/{name}.pyx"],
        include_dirs=["csrc", "csrc/lmdb", numpy.get_include()],
        define_macros=macros,
        extra_compile_args=ext_flags,
        extra_link_args=san + (["-pthread"] if "sclmdb" in libs else []),
        libraries=list(libs),
        # The C libraries are static: relink (and recompile, for the headers) when they change.
        depends=sorted(glob.glob("csrc/*.c") + glob.glob("csrc/*.h") + glob.glob("csrc/lmdb/*.[ch]")),
    )


extensions = cythonize(
    [ext("_codec"), ext("_core"), ext("_sink"), ext("_tables"), ext("_states"), ext("_mdb", ("sclmdb",)),
     ext("_lmdb")],
    compiler_directives={"language_level": 3, "embedsignature": True, "binding": True},
    include_path=["."],
)



class BuildExt(build_ext):
    """Build the C core library first, also for ``build_ext --inplace`` and editable installs."""

    def run(self):
        self.run_command("build_clib")
        super().run()

    def build_extension(self, ext):
        # build_ext links every build_clib library into every extension; each Extension names its own
        # (LMDB goes into statecore._mdb alone).
        self.compiler.set_libraries([])
        super().build_extension(ext)


setup(libraries=libraries, ext_modules=extensions, cmdclass={"build_ext": BuildExt})
