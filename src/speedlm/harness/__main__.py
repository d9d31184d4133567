"""`python -m speedlm.harness ARGS`: lm-evaluation-harness's own command line (`lm_eval ARGS`)
with the model "speedlm" registered, e.g.

    python -m speedlm.harness run --model speedlm --model_args checkpoint=runs/train --tasks lambada_openai --device cpu

(`lm_eval --model speedlm` alone cannot find it: lm_eval 0.4.13 reads no entry points, it knows
only the models registered in its own process.)"""

import sys

from speedlm.errors import SpeedlmError

try:  # a speedlm mistake (no lm_eval, a bad checkpoint or model_args) is one line, exit code 2, as `speedlm`
    import speedlm.harness.model  # noqa: F401  registers "speedlm"
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
except SpeedlmError as e:
    print(f"speedlm: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
