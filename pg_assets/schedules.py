"""A daily schedule per table that materializes the day that just ended.

`build_schedule_from_partitioned_job` targets the last complete partition in the
partitions' own time zone, so a Europe/Berlin table runs shortly after Berlin midnight. The
job's partitions are the asset's (Dagster infers them; passing them again is deprecated).
Names: job `<asset op name>__daily`, schedule `<asset op name>__daily_schedule`, e.g.
`demo__public__orders__daily_schedule`.
"""

from dagster import (
    AssetsDefinition,
    ScheduleDefinition,
    build_schedule_from_partitioned_job,
    define_asset_job,
)


def build_daily_schedule(asset_def: AssetsDefinition, hour_of_day: int = 1) -> ScheduleDefinition:
    job = define_asset_job(
        name=f"{asset_def.op.name}__daily",
        selection=[asset_def.key],
    )
    return build_schedule_from_partitioned_job(job, hour_of_day=hour_of_day)
