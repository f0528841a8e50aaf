"""The Gemma 1/2 family (``gemma``, ``gemma2``).

Everything as Gemma 3 (:mod:`core.families.gemma3`) except the chat template,
which raises ``System role not supported``: system text is folded into the
first user turn, the way Gemma 3's template folds it.
"""

from __future__ import annotations

from .gemma3 import Gemma3Family

FAMILY = Gemma3Family(name="gemma2", chat_template="gemma2_chat_template.jinja", system_role=False)
