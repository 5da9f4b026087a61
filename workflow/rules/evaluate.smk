# ScienceQA accuracy per category, Alpaca held-out loss and perplexity (llama_adapter.evaluate).


rule evaluate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        adapter=trained_adapter,
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
        options=lambda w, input: (
            f"--task scienceqa --data {input.data} --split {evaluation_split(w.experiment)} "
            f"--mode {config['evaluate']['mode']}"
            + (f" --image-features {input.images}" if input.images else "")
            if experiment(w.experiment)[0] == "scienceqa"
            else f"--task alpaca --data {input.data}/val --row-len {config['train']['row_len']}"
        ),
        batch=config["evaluate"]["batch_size"],
    shell:
        "llama-adapter evaluate --base {input.base} --tokenizer {input.tokenizer} --adapter {input.adapter} "
        "--out {params.out} --batch-size {params.batch} {params.options} --run-name 'evaluate {wildcards.experiment}' "
        "--tag rule=evaluate --tag experiment={wildcards.experiment} > {log} 2>&1"
