"""Airflow DAGs that run recfb's pipelines through its CLI (copy into the DAGs folder; set
RECFB_HOME to the checkout). The CLI does the work, the locking and the MLflow records;
Airflow only schedules, retries a failed run (which resumes at the failed stage) and skips
when the previous run still holds the lock (exit 75)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

HOME = os.environ.get("RECFB_HOME", "/srv/recfb")

for name, schedule in (("nightly", "0 2 * * *"), ("hourly", "15 * * * *")):
    with DAG(
        dag_id=f"recfb_{name}",
        schedule=schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
        tags=["recfb"],
    ) as dag:
        BashOperator(
            task_id="pipeline",
            bash_command=f"cd {HOME} && .venv/bin/recfb pipeline run pipelines/{name}.yaml",
            skip_on_exit_code=75,
        )
    globals()[f"recfb_{name}"] = dag
