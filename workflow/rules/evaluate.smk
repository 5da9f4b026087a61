# ScienceQA accuracy per category, Alpaca held-out loss and perplexity (llama_adapter.evaluate).


rule evaluate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        trained=trained,
        data=evaluation_data,
        images=image_features,
    output:
        f"{RESULTS}/eval/{{experiment}}/scores.json",
    log:
        f"{RESULTS}/logs/evaluate/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{experiment}}.tsv"
    conda:
        CONDA_ENV
    threads: 1  # mostly start-up and small forward passes: runs beside a training job
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    params:
        out=lambda w, output: Path(output[0]).parent,
        model=model_options,
        options=evaluation_options,
        batch=config["evaluate"]["batch_size"],
        run_name=lambda w: f"evaluate {w.experiment}",
        tags=lambda w: ["--tag", "rule=evaluate", "--tag", f"experiment={w.experiment}"],
    shell:
        "llama-adapter evaluate {params.model:q} --tokenizer {input.tokenizer:q} "
        "--out {params.out:q} --batch-size {params.batch:q} {params.options:q} --run-name {params.run_name:q} "
        "{params.tags:q} > {log:q} 2>&1"
