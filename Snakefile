# LLaMA-Adapter (Zhang et al. 2023) as a rerunnable DAG. The rules call the `llama-adapter` CLI; the science
# lives in the package (src/llama_adapter), which works without Snakemake.


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/tracking.smk"


rule all:
    input:
        rules.report.output,
