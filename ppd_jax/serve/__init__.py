"""The web demo: a local page where a person labels 4 pairs and sees the run generate for them.

    engine.py    the model side (pairs of base images, the new user's embedding, generation)
    jobs.py      one worker thread: one model call at a time, a bounded queue, step progress
    app.py       the HTTP routes (FastAPI), request limits, errors as messages
    static/      the page (plain HTML, CSS and JavaScript; nothing fetched from elsewhere)
    __main__.py  `python -m ppd_jax.serve --workdir=W`

Optional (`pip install -e ".[serve]"`): training and sampling never import this package.
"""
