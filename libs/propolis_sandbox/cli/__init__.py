"""The harness's verb groups of the `propolis` command, found by the product through the `propolis.cli`
entry point (so `propolis demo`, `propolis sandbox …` work while the product never imports this package)."""

#: In the order `propolis --help` lists them: what a newcomer runs first, benchmarks last.
COMMAND_MODULES = [
    "propolis_sandbox.cli.demo_cmd",
    "propolis_sandbox.cli.sandbox_cmd",
    "propolis_sandbox.cli.clustermesh_cmd",
    "propolis_sandbox.cli.bench_cmd",
]
