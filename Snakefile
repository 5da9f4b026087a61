# LLaMA-Adapter (Zhang et al. 2023) as a rerunnable DAG. The rules call the `llama-adapter` CLI; the science
# lives in the package (src/llama_adapter), which works without Snakemake.


import time

from llama_adapter.tracking import end_invocation_run, start_invocation_run


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onstart:
    start_invocation_run(f"snakemake {time.strftime('%Y-%m-%d %H:%M:%S')}", config)


onsuccess:
    end_invocation_run("FINISHED")


onerror:
    end_invocation_run("FAILED")


rule all:
    input:
        rules.report.output,
