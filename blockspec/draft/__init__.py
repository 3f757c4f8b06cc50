"""Draft networks: DFlash and DFlare, their config and their checkpoints."""

from blockspec.draft.checkpoint import check_draft_fits_target, load_draft, new_draft_for_target, save_draft
from blockspec.draft.config import ARCHITECTURES, DraftConfig, default_target_layer_ids
from blockspec.draft.model import MASK_EMBEDDING, DraftModel, new_draft

__all__ = ["ARCHITECTURES", "DraftConfig", "DraftModel", "MASK_EMBEDDING", "check_draft_fits_target",
           "default_target_layer_ids", "load_draft", "new_draft", "new_draft_for_target", "save_draft"]
