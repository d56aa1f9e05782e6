"""The worker: the faust app (app) around the worker core (core, no faust), with acks,
progress, metrics and what it patches inside faust and aiokafka (patches)."""
