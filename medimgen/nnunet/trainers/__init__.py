"""nnU-Net trainers medimgen ships, found by ``nnUNetv2_train -tr NAME`` through nnU-Net's ``nnUNet_extTrainer``
(:data:`medimgen.nnunet.commands.TRAINERS_DIR`); nnU-Net imports each module of this folder as a top-level module."""
