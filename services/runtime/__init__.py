"""What every service shares: settings, buses, the message pipeline, LLM gateway, idempotency. Never run."""

import os

# LiteLLM fetches its price list from the internet when it is imported unless told otherwise;
# the copy shipped in its wheel is what we want (no network at run time). This must run before
# any module imports litellm, hence here.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
