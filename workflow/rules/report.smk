# The paper's tables and figures from every run (llama_adapter.report); `snakemake --report` shows them
# with the captions in workflow/report/.


rule report:
    input:
        **{role: list(paths.values()) for role, paths in report_inputs().items()},
    output:
        **{
            t: report_file(f"{t}.csv", "Tables", REPORT_CAPTIONS.get(t))
            for t in REPORT_TABLES
        },
        **{f: report_file(f"{f}.png", "Figures") for f in REPORT_FIGURES},
        # The same figures as PDF, for a paper; the HTML report shows the PNGs.
        **{f"{f}_pdf": f"{RESULTS}/report/{f}.pdf" for f in REPORT_FIGURES},
        markdown=f"{RESULTS}/report/report.md",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        CONDA_ENV
    params:
        out=lambda w, output: Path(output.markdown).parent,
        options=report_options(),
    shell:
        "llama-adapter report --out {params.out:q} {params.options:q} > {log:q} 2>&1"
