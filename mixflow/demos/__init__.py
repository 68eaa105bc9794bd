"""The demo models and their training loops: what ``trainer.model`` names in a spec.

They are not library API. Each loop is an entrypoint like a user's own, a function
``train(feed, context)`` over the public feed (:mod:`mixflow.runtime.rank_feed`), run by
mixflow's rank actors exactly as a spec's ``trainer.entrypoint`` is; ``trainer.model: X``
is shorthand for ``trainer.entrypoint: BUILTIN_ENTRYPOINTS[X]``.
"""

BUILTIN_ENTRYPOINTS = {
    "digits_cnn": "mixflow.demos.digits_loop:train",
    "none": "mixflow.demos.consume_loop:consume",
    "byte_gpt": "mixflow.demos.lm_loop:train",
    "unigram": "mixflow.demos.lm_loop:train",
}

# Built-in loops that train no DDP model, so their ranks need no process group.
WITHOUT_PROCESS_GROUP = ("none", "unigram")
