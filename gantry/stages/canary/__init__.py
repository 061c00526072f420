"""Stage `canary`, a package because it is the biggest stage.

* :mod:`.state`: the deployment's durable status (phases, champion/candidate/previous)
  and its lock;
* :mod:`.machine`: the transition table, ``transition(status, event) -> (status,
  effects)``, pure;
* :mod:`.executor`: the one executor that applies effects to the deploy target, MLflow
  and the status file;
* :mod:`.analysis` and :mod:`.probes`: one step's window observed and judged;
* :mod:`.run`: the stage's ``run()``; :mod:`.rollback`: ``gantry rollback``;
* :mod:`.serving`: starting a recorded version again, verified.
"""
