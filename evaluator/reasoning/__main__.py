"""lm-eval's own CLI with the ``big5`` model registered and the local tasks included.

    python -m evaluator.reasoning --model big5 --model_args persona=big5/sft?neuroticism=-1 \
        --tasks big5_piqa,big5_arc_easy --limit 50

lm-eval 0.4.x finds models only in its registry (no plugin entry points), so a model class outside
lm-eval must be imported before the CLI looks it up; this module does that, writes the local task
YAMLs with absolute data paths to a temporary folder and passes it as ``--include_path``. The stock
tasks stay available (``--tasks piqa`` downloads from the hub, as lm-eval always does).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main() -> None:
    import evaluator.reasoning.lm  # noqa: F401 - registers "big5"
    from big5core.settings import get_settings
    from evaluator.reasoning.tasks import write_include_dir

    with tempfile.TemporaryDirectory(prefix="big5-tasks-") as folder:
        write_include_dir(Path(folder), get_settings().reasoning)
        if "--include_path" not in sys.argv:
            at = 2 if len(sys.argv) > 1 and sys.argv[1] in ("run", "ls", "validate") else 1
            sys.argv[at:at] = ["--include_path", folder]
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()


if __name__ == "__main__":
    main()
