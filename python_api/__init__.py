"""silent_kernels.api: the user-facing layer (modules, estimators, trainer, CLI),
built only on the public ``silent_kernels`` API."""
