# The paper's tables and figures from every run (llama_adapter.report); `snakemake --report` shows them
# with the captions in workflow/report/.


rule report:
    input:
        scores=expand(
            f"{RESULTS}/eval/{{experiment}}/scores.json", experiment=EXPERIMENTS
        ),
        generations=expand(
            f"{RESULTS}/generations/{{experiment}}.jsonl",
            experiment=INSTRUCTION_EXPERIMENTS,
        ),
        tokens=f"{RESULTS}/tokens/alpaca",
    output:
        **{
            t: report_file(f"{t}.csv", "Tables", REPORT_CAPTIONS.get(t))
            for t in REPORT_TABLES
        },
        **{f: report_file(f"{f}.png", "Figures") for f in REPORT_FIGURES},
        markdown=f"{RESULTS}/report/report.md",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        CONDA_ENV
    params:
        out=lambda w, output: Path(output.markdown).parent,
        results=lambda w, input: Path(input.tokens).parents[1],
        experiments=[arg for e in NAMED_EXPERIMENTS for arg in ("--experiment", e)],
        ablations=[
            arg
            for e in ABLATION_EXPERIMENTS
            for arg in ("--ablation", f"{e}={trained_as(e)}")
        ],
        center=json.dumps(config["ablations"]["center"]),
        vary=json.dumps(ABLATION_AXES),
    shell:
        "llama-adapter report --results {params.results:q} --out {params.out:q} {params.experiments:q} "
        "{params.ablations:q} --center {params.center:q} --vary {params.vary:q} > {log:q} 2>&1"
