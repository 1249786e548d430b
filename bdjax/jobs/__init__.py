"""Jobs a recipe can name in `config.job`; each is `run(config) -> dict` and writes into `config.workdir`."""

from bdjax.jobs import attack_study, backdoor, defend, defense_study, detect, generate, generative

JOBS = {"backdoor": backdoor.run, "generate": generate.run, "generative": generative.run,
        "attack_study": attack_study.run, "defend": defend.run,
        "detect": detect.run, "defense_study": defense_study.run}
