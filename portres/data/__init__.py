"""Data sets and batches for training: CIFAR-10/100, scikit-learn's digits, image folders;
augmentation vectorised in NumPy. Nothing here imports a framework.
"""
