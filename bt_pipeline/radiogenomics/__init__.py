"""After evaluation: tumour shape features of manual and automatic masks, tested against the
dataset's genomic subtypes (`bt radiogenomics`)."""
