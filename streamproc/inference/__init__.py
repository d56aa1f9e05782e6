"""Closed windows -> predictions on the predictions topic.

    outputs      the worker's window output: ``WindowOutput`` and its two kinds,
                 ``SummaryOutput`` (align-only) and ``InferenceOutput`` (with a model)
    batcher      ``MicroBatcher``: windows of every stream share one model call in a thread
    predictor    ``Predictor``: a loaded model, a batch of windows -> ``Scored`` per window
    predictions  prediction records: window summary, latency breakdown, who-wrote headers
    groups       start-up check for other worker groups writing the same predictions topic
"""
