"""``muse-eval <tool> ...`` (or ``python -m muse.eval <tool> ...``): dispatch to a tool's ``main``."""

from __future__ import annotations

import importlib
import sys

TOOLS = {"reconstruct": "reconstruct", "recon-metrics": "recon_metrics", "linear-probe": "linear_probe",
         "zero-shot": "zero_shot", "seg-probe": "seg_probe", "attention-maps": "attention_maps",
         "grad-orthogonality": "grad_orthogonality"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOLS:
        print(f"usage: muse-eval {{{','.join(TOOLS)}}} [options]  (muse-eval <tool> --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"muse.eval.{TOOLS[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
