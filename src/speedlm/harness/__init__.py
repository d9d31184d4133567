"""speedlm checkpoints in EleutherAI's lm-evaluation-harness (`lm_eval`, the `eval` extra).

`speedlm.harness.model.SpeedlmLM` is the harness's `LM`, registered as the model "speedlm"
when that module is imported; `speedlm eval --tasks` (speedlm.harness.run) runs tasks with it,
and `python -m speedlm.harness ARGS` is the harness's own command line with it registered
(lm_eval 0.4.13 finds third-party models only in-process: it reads no entry points).
Nothing here is imported unless asked for, so speedlm works without lm_eval installed.
"""


def require_lm_eval():
    """The `lm_eval` module, or a SpeedlmError that says how to install it."""
    from speedlm.errors import SpeedlmError

    try:
        import lm_eval
    except ImportError:
        raise SpeedlmError("lm-evaluation-harness is not installed; install the `eval` extra: "
                           "pip install 'speedlm[eval]'") from None
    return lm_eval
