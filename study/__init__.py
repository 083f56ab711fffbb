"""`sift study`: the time-to-accuracy study (cli.py) and its spec, jobs, report and figures; see docs/study.md."""
