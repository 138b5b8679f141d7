"""stepwatch analytics: detectors, the clip policy, and offline reports (pure numpy/polars).

    events.py        Event (kind, run, step, site, value, threshold, severity, onset, detail)
    catalog.py       MetricIndex: where each statistic sits in a step's value vector
    frame.py         StepFrame: one reduced step (+ lazy per-rank values)
    rolling.py       rolling windows for robust baselines
    detectors/       one small stateful dataclass per detector; DetectorSet runs them all
    decisions.py     the decision layer: which events may move a clamp (clamp / warn / info)
    incidents.py     events linked by site and time into incidents, each with its origin
    clip_policy.py   clamp decisions -> SwiGLU clamp settings (and their relaxation)
    offline.py       the detectors over a stored run (same events as online)
    report/          `python -m analytics report`: self-contained HTML + JSON findings

Never imports torch, grpc or collector; only offline.py's callers and report/ touch a store
(through its read API). The collector runs the same classes online (collector/detect.py).
"""
