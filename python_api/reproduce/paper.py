"""The paper's numbers, copied from its text, and the display name of every arm.

Source: ../shared/papers/silent-gradients-zero-variance-vae.txt (facts, not code). The report
prints these beside ours; nothing here is computed.
"""

__all__ = ["PAPER", "LABELS"]

PAPER = {
    "table1": {   # total encoder-gradient variance at epochs 10, 200, 500
        "epochs": [10, 200, 500],
        "silent-gaussian": [0.0, 0.0, 0.0],
        "reparam": [1.08e5, 1.78e4, 1.37e4],
        "silent-bernoulli": [0.0, 0.0, 0.0],
        "gumbel": [1.10e5, 2.08e5, 1.68e5],
        "reinforce": [2.30e8, 6.30e7, 4.00e7],
    },
    "table2": {   # MNIST, linear decoder, sigma^2 = 0.01, d = 200: (BPD, MSE) at epoch 500
        "silent-gaussian": {"bpd": 6.718, "mse": 3.011},
        "reparam": {"bpd": 6.722, "mse": 3.059},
        "silent-bernoulli": {"bpd": 6.900, "mse": 6.103},
        "gumbel": {"bpd": 6.990, "mse": 7.670},
        "reinforce": {"bpd": 7.208, "mse": 9.289},
        "milestone": {"bpd": 6.73, "silent-gaussian": 45, "reparam": 90},
    },
    "table3": {   # BPD, learnable variance
        "mnist": {"sg-gaussian": 2.41, "reparam": 1.91, "reparam+sg": 1.80, "sg-bernoulli": 2.77,
                  "gumbel": 2.48, "gumbel+sg": 2.37, "reinforce": 2.96, "reinforce+sg": 2.94},
        "imagenet32": {"sg-gaussian": 5.98, "reparam": 5.79, "reparam+sg": 5.69, "sg-bernoulli": 6.45,
                       "gumbel": 6.31, "gumbel+sg": 6.20, "reinforce": 6.87, "reinforce+sg": 6.77},
        "cifar10": {"sg-gaussian": 5.82, "reparam": 5.70, "reparam+sg": 5.53, "sg-bernoulli": 6.72,
                    "gumbel": 6.22, "gumbel+sg": 6.19, "reinforce": 6.74, "reinforce+sg": 6.67},
    },
    "table4": {   # KLD (nats per image), learnable variance
        "mnist": {"sg-gaussian": 330.77, "reparam": 155.15, "reparam+sg": 165.76, "sg-bernoulli": 91.82,
                  "gumbel": 94.64, "gumbel+sg": 96.24, "reinforce": 109.67, "reinforce+sg": 128.55},
        "imagenet32": {"sg-gaussian": 478.43, "reparam": 382.87, "reparam+sg": 533.20,
                       "sg-bernoulli": 534.29, "gumbel": 368.02, "gumbel+sg": 404.57,
                       "reinforce": 294.88, "reinforce+sg": 381.27},
        "cifar10": {"sg-gaussian": 550.70, "reparam": 427.79, "reparam+sg": 577.25, "sg-bernoulli": 243.69,
                    "gumbel": 446.75, "gumbel+sg": 442.58, "reinforce": 303.33, "reinforce+sg": 367.10},
    },
}

LABELS = {
    "silent-gaussian": "Silent Gradients (continuous)", "reparam": "Reparameterization",
    "silent-bernoulli": "Silent Gradients (discrete)", "gumbel": "Gumbel-Softmax",
    "reinforce": "REINFORCE", "sg-gaussian": "None + SG (continuous)",
    "sg-gaussian-exact": "None + SG (continuous), exact log term (ours)",
    "reparam+sg": "Reparameterization + SG", "sg-bernoulli": "None + SG (discrete)",
    "gumbel+sg": "Gumbel-Softmax + SG", "reinforce+sg": "REINFORCE + SG",
    "elbo": "D_KL-ELBO (linear decoder, learned sigma^2)", "m1": "D_KL-M1 (analytic M1)",
    "cat-silent": "Silent Gradients (categorical)", "cat-gumbel": "Gumbel-Softmax (categorical)",
    "cat-gumbel-st": "Straight-through Gumbel (categorical)", "cat-reinforce": "REINFORCE (categorical)",
    "cat-sg": "None + SG (categorical)", "cat-gumbel-nl": "Gumbel-Softmax, nonlinear (categorical)",
    "cat-gumbel-nl+sg": "Gumbel-Softmax + SG (categorical)",
    "cat-reinforce-nl": "REINFORCE, nonlinear (categorical)", "cat-reinforce-nl+sg": "REINFORCE + SG (categorical)",
}
