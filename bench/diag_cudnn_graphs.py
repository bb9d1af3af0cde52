import sys, pytest
from torch.nn.attention import SDPBackend
import lorafit.model.llama as llama
llama.RECORDED_MASKED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
sys.exit(pytest.main(["-q", "-m", "gpu", "tests/test_graphs.py", "-k", "many_replays", "-p", "no:cacheprovider", "--tb=line"]))
