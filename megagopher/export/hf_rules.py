"""One entry point to the weight mappings of every Hugging Face format: the classic ones (hf_arch.py) and
those of 2024-2026 (hf_arch_recent.py, which builds on hf_arch's helpers; dispatching here keeps the
import graph one-way)."""
from megagopher.export.hf_arch import RULES as CLASSIC
from megagopher.export.hf_arch_recent import RULES as RECENT


def rules(fmt, cfg, **options):
    """The Rules of format ``fmt`` for the model ``cfg``; ``options``: a format's layout switches
    (DeepSeek-V3's rope_interleave)."""
    if fmt in CLASSIC:
        return CLASSIC[fmt](cfg)
    return RECENT[fmt](cfg, **options)
