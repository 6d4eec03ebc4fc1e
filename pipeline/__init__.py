"""The Ray Data pipeline that runs glmv over media corpora."""
