"""Data curation with the paper's rules (FineViT §3.3, Appendix A): pHash de-duplication, size /
aspect / quality filters for images, and confidence / area / NMS / class-balance rules for
regions. `Curator` (pipeline.py) runs them over a sample stream; `tools/curate.py` over shards."""

from megatron_finevit.curation.config import CurationConfig, apply_overrides
from megatron_finevit.curation.pipeline import IMAGE_RULES, Curator, Decision, format_report
from megatron_finevit.curation.regions import REGION_RULES, ClassBalancer, filter_regions

__all__ = ["CurationConfig", "apply_overrides", "Curator", "Decision", "format_report",
           "IMAGE_RULES", "REGION_RULES", "ClassBalancer", "filter_regions"]
