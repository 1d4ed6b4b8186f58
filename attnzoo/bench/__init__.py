"""The measuring lab: workloads (seeded generators with planted structure), metrics, runner, report."""
