"""The live Streamlit dashboard over a stepwatch store (`python -m dashboard --store URL`).

    app.py      the Streamlit script: sidebar, then the page body as a self-refreshing fragment
    reads.py    every store read, cached per (URL, run, args, run version)
    data.py     pure frame shaping: min/max downsampling, heatmap cells, run alignment
    charts.py   Altair chart builders
    panels/     runs list, replay (slider, play, curves), heatmaps, events + clips, compare,
                metric explorer

Imports only store (and, later, analytics) of ours.
"""
