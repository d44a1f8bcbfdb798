"""bench/scheduler_sim.py runs the real scheduling rules on a simulated pool at a small size, reports what
the issue asks for and exits 0 when the targets hold (the default size's figures are in docs/scheduling.md)."""

import json

from bench import scheduler_sim


def test_scheduler_simulation_reports_shares_waits_preemptions_and_utilisation(tmp_path):
    out = tmp_path / "scheduler_sim.json"

    exit_code = scheduler_sim.main(["--jobs", "800", "--gpus", "16", "--seed", "1", "--out", str(out)])

    results = json.loads(out.read_text())
    assert exit_code == 0 and results["ok"] is True
    assert results["config"]["jobs"] == 800 and results["config"]["gpus"] == 16
    on, off = results["runs"]["preemption on"], results["runs"]["preemption off"]
    for run in (on, off):
        assert {"shares", "light_wait", "utilisation"} == run["checks"].keys()
        assert all(check["ok"] for check in run["checks"].values()), run["checks"]
        assert len(run["teams"]) == 10 and sum(row["jobs"] for row in run["teams"]) == 800
        heavy = [row for row in run["teams"] if not row["light"]]
        assert abs(sum(row["share"] for row in heavy) - 1) < 1e-9 and abs(sum(row["target"] for row in heavy) - 1) < 1e-9
        assert 0 < run["window_s"] <= run["makespan_s"]
        assert run["light_jobs"] > 0 and run["light_worst_wait_s"] >= run["light_mean_wait_s"] > 0
        assert 0.97 <= run["utilisation"] <= 1 + 1e-9
    assert on["preemptions"] > 0 and off["preemptions"] == 0
    assert on["useful_utilisation"] < on["utilisation"]  # the pauses of preempted jobs, counted apart
    assert on["light_worst_wait_s"] < off["light_worst_wait_s"]  # preemption is what gets a light job in quickly

    only_off = scheduler_sim.main(["--jobs", "800", "--no-preemption", "--seed", "1", "--out", str(out)])
    assert only_off == 0 and list(json.loads(out.read_text())["runs"]) == ["preemption off"]


def test_passing_each_teams_first_jobs_gives_the_rules_the_same_answer_as_passing_the_whole_queue():
    """The simulator hands the rules each team's first jobs only (to run in seconds); the service hands
    them every queued job. Same runs either way."""

    class WholeQueue(scheduler_sim.Simulation):
        def heads(self, per_team: int, ready: bool = False) -> list:
            return super().heads(10**9, ready)

    args = scheduler_sim.parse_args(["--jobs", "150", "--gpus", "4", "--interval", "60"])
    for preemption in (True, False):
        runs = []
        for simulation in (scheduler_sim.Simulation, WholeQueue):
            workload = scheduler_sim.make_workload(args.jobs, args.gpus, args.seed)
            sim = simulation(scheduler_sim.config_from(args, preemption), workload)
            sim.run()
            runs.append((scheduler_sim.measure(sim, workload),
                         [(job.id, job.first_start, job.preempted) for job in workload]))
        assert runs[0] == runs[1]
        assert preemption is False or runs[0][0]["preemptions"] > 0
