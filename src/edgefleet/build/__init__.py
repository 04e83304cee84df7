"""The build plane: compress a float model under an accuracy gate, measure it, check it against devices.

    inputs.py     a float ONNX model and validated data (files, a torch ``module:function``, a bundled dataset)
    passes/       one module per compression pass (static_int8, dynamic_int8, fp16), registered by name
    recipe.py     which candidates to try, the gate, the rescue search, how to time (YAML, pydantic)
    pipeline.py   BuildSearch: candidates -> gate -> rescue (sensitive nodes kept in float) -> choice
    sensitivity.py  per-tensor quantization error, to rank nodes for the rescue
    analyze.py    pure graph analysis: parameters, MACs per node, weight bytes; memory.py: the arena plan;
                  energy.py: the per-operation energy estimate
    latency.py    ONNX Runtime timing on this host; evaluate.py: accuracy
    report.py     terminal table, REPORT.json, Pareto plot
    product.py    build_bundle: inputs -> search -> the chosen model signed as a bundle (edgefleet build and demo)
"""
