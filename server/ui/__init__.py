"""``ecsearch ui``: a search page in the browser over the gRPC server (issue 17).

The page is a client of ``ecsearch.v1.SearchService`` like ``ecsearch query``: it holds no
index and no model. ``app.py`` assembles the Starlette app, ``search_api.py`` turns form
input into ``SearchRequest`` and responses into JSON (facet counts, readable errors),
``images.py`` serves catalogue photos from one folder, ``cli.py`` is the command, and
``static/`` holds the page (plain HTML, CSS and JavaScript; no build step).
"""
