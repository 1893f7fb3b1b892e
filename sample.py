"""Generate samples, or search a step schedule: see conf/sample.yaml.

    python sample.py model=... sampler=... seeds=0-999                        (mode=generate)
    python sample.py mode=optimize_schedule sampler=dpmpp_2m schedule_search.nfe=5 \
        schedule_search.method=gits|ays                                       (docs/schedules.md)
"""

import hydra
from omegaconf import DictConfig

from fastsample.jobs.cli import sample_main


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> float:
    return sample_main(cfg)


if __name__ == "__main__":
    main()
