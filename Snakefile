# LLaMA-Adapter (Zhang et al. 2023) as a rerunnable DAG. The rules call the `llama-adapter` CLI; the science
# lives in the package (src/llama_adapter), which works without Snakemake.


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        expand(f"{RESULTS}/eval/{{experiment}}/scores.json", experiment=EXPERIMENTS),
        expand(
            f"{RESULTS}/generations/{{experiment}}.jsonl",
            experiment=INSTRUCTION_EXPERIMENTS,
        ),
