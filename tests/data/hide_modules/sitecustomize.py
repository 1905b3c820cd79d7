"""What a machine without some Python modules sees: put this directory on PYTHONPATH and name the
modules in RELAYMILTER_HIDE_MODULES (comma-separated); importing one of them, or anything under it,
then fails with ModuleNotFoundError exactly as if it were not installed (child processes inherit it).
"""

import os
import sys

_HIDDEN = frozenset(name for name in os.environ.get("RELAYMILTER_HIDE_MODULES", "").split(",") if name)


class _Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None


if _HIDDEN:
    sys.meta_path.insert(0, _Hide())
