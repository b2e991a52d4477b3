"""Training and evaluation of a point-cloud model from a run config: the paper's recipe (§3.1),
resumable, multi-GPU. One module per job, each imported from where it lives:

- :mod:`.run_config`: the schema of a run (``model``, ``data``, ``train`` sections), read from a
  recipe YAML file and ``--set`` overrides (typed by :mod:`.overrides`), every key documented;
- :mod:`.model_factory`: the model of a run, and :func:`~.model_factory.model_overrides`, the one
  mapping from a run config to :class:`~any2point_fast.config.Any2PointConfig` fields;
- :mod:`.datasets`: train and test sets whose items depend only on ``(seed, epoch, index)``;
- :mod:`.optimization`: AdamW groups, the warm-up + cosine schedule, the gradient scaler;
- :mod:`.runtime`: process group, device, precision and process-wide settings;
- :mod:`.session`: a run's set-up on one process (data, model, optimizer, resume, header lines);
- :mod:`.engine`: :func:`~.engine.train`, the loop;
- :mod:`.checkpointing`: what a checkpoint holds, saving it and resuming from it;
- :mod:`.evaluation`: evaluation of a model and of a saved checkpoint;
- :mod:`.run_log`: ``config.yaml``, ``metrics.jsonl`` and the lines a run prints.
"""
