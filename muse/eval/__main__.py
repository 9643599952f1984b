"""``muse-eval <tool> ...`` (or ``python -m muse.eval <tool> ...``): dispatch to a tool's ``main``."""

from __future__ import annotations

import importlib
import sys

TOOLS = {"reconstruct": "reconstruct", "recon-metrics": "recon_metrics", "linear-probe": "linear_probe",
         "zero-shot": "zero_shot", "seg-probe": "seg_probe", "attention-maps": "attention_maps",
         "grad-orthogonality": "grad_orthogonality", "table": "table", "gfid": "muse.gen.gfid"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: muse-eval {{{','.join(TOOLS)}}} [options]  (muse-eval <tool> --help)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage + "\n\ntools:\n" + "\n".join(f"  {name}" for name in TOOLS))
        return 0
    if not argv or argv[0] not in TOOLS:
        print(usage if not argv else f"{usage}\nmuse-eval: unknown tool {argv[0]!r}", file=sys.stderr)
        return 2
    name = TOOLS[argv[0]]  # a tool of another package is named by its full module path
    module = importlib.import_module(name if "." in name else f"muse.eval.{name}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
