"""The layering rules: the core runs without pyfuse3, and --help loads none of the network stack."""

from __future__ import annotations

import subprocess
import sys

BLOCK_PYFUSE3 = """
import sys
class NoPyfuse3:
    def find_spec(self, name, path=None, target=None):
        if name == "pyfuse3" or name.startswith("pyfuse3."):
            raise ImportError("pyfuse3 is not installed here")
        return None
sys.meta_path.insert(0, NoPyfuse3())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_core_imports_without_pyfuse3() -> None:
    core = ["api", "blocks", "meta", "cachekey", "core", "fetch", "gzview", "prefetch", "reader"]
    core += ["resolver", "tree", "version"]
    code = BLOCK_PYFUSE3 + "".join(f"import vapifs.{name}\n" for name in core)
    code += "assert 'pyfuse3' not in sys.modules\nprint('ok')\n"
    result = run(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # The check itself works: the adapter does need pyfuse3.
    assert "pyfuse3 is not installed here" in run(BLOCK_PYFUSE3 + "import vapifs.fs\n").stderr


def test_help_loads_neither_fuse_nor_the_network_stack() -> None:
    code = (
        "import sys\n"
        "from vapifs.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = {'pyfuse3', 'trio', 'httpx', 'httpcore', 'cryptography'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
