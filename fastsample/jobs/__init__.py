"""Jobs: what the entry points run (sampling, evaluation, training, schedule search, benchmarks,
sweeps, the demo). Every job turns its config into a model, sampler, guidance and seeds through
:func:`fastsample.jobs.setup.plan`; nothing below this package imports a job."""
