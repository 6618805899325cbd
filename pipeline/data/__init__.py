"""Reading datasets: the Decathlon and nnU-Net v2 raw layouts, images of every format in canonical orientation,
validation of every case before anything is written, layout conversion and synthetic phantoms."""
