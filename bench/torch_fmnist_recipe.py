"""The default Fashion-MNIST recipe re-implemented in PyTorch + timm (eager), as a reference for
learning dynamics and speed (BENCHMARKS.md). Dev-only; never run by CI.

    EP=1 .venv/bin/python bench/torch_fmnist_recipe.py        # one epoch, 2 threads

Environment knobs: EP (epochs), BS, LR, CROP (pad; one offset per batch), P/D/L/H/MR (patch, width,
depth, heads, MLP ratio), LS (label smoothing), WD, T (threads). Differences from `vit train`: the
validation set is the last 5,000 training images (ours draws 5,000 by seed), the crop offset is one per
batch, and there are no flips. Prints validation accuracy per epoch and test accuracy.
"""
import gzip, math, os, time

import numpy as np
import timm
import torch

torch.set_num_threads(2); torch.manual_seed(0)
d='/usr/share/datasets/fashion-mnist/'
def idx(f):
    p=d+f
    with (gzip.open(p) if p.endswith('.gz') else open(p,'rb')) as fh: b=fh.read()
    nd=b[3]; dims=[int.from_bytes(b[4+4*i:8+4*i],'big') for i in range(nd)]
    return np.frombuffer(b,np.uint8,offset=4+4*nd).reshape(dims)
fs=sorted(os.listdir(d))
def find(k): return [f for f in fs if k in f][0]
X=idx(find('train-images')); Y=idx(find('train-labels')); Xt=idx(find('t10k-images')); Yt=idx(find('t10k-labels'))
X=torch.tensor(X,dtype=torch.float32).div(255).sub(0.2860).div(0.3530).unsqueeze(1); Y=torch.tensor(Y,dtype=torch.long)
Xt=torch.tensor(Xt,dtype=torch.float32).div(255).sub(0.2860).div(0.3530).unsqueeze(1); Yt=torch.tensor(Yt,dtype=torch.long)
Xv,Yv=X[55000:],Y[55000:]; X,Y=X[:55000],Y[:55000]
E=os.environ.get
epochs=float(E('EP','1')); crop=int(E('CROP','2')); P=int(E('P','4')); D=int(E('D','64')); L=int(E('L','6')); H=int(E('H','4')); MR=float(E('MR','2')); LR=float(E('LR','2e-3')); bs=int(E('BS','128')); LS=float(E('LS','0.1')); WD=float(E('WD','0.05')); torch.set_num_threads(int(E('T','2')))
m=timm.models.vision_transformer.VisionTransformer(img_size=28,patch_size=P,in_chans=1,num_classes=10,embed_dim=D,depth=L,num_heads=H,mlp_ratio=MR)
decay=[p for n,p in m.named_parameters() if p.ndim>1 and 'pos_embed' not in n and 'cls_token' not in n]
nod=[p for n,p in m.named_parameters() if not(p.ndim>1 and 'pos_embed' not in n and 'cls_token' not in n)]
opt=torch.optim.AdamW([{'params':decay,'weight_decay':WD},{'params':nod,'weight_decay':0}],lr=LR)
spe=len(X)//bs; total=int(epochs*spe); warm=spe//2
def lr_at(s): return LR*s/warm if s<warm else 1e-5+(LR-1e-5)*0.5*(1+math.cos(math.pi*(s-warm)/(total-warm)))
crit=torch.nn.CrossEntropyLoss(label_smoothing=LS)
step=0;t0=time.time()
while step<total:
    perm=torch.randperm(len(X))
    for i in range(spe):
        if step>=total: break
        idxs=perm[i*bs:(i+1)*bs]; xb=X[idxs]
        if crop:
            xb=torch.nn.functional.pad(xb,(crop,)*4)
            dx,dy=np.random.randint(0,2*crop+1,2); xb=xb[:,:,dy:dy+28,dx:dx+28]
        for g in opt.param_groups: g['lr']=lr_at(step)
        loss=crit(m(xb),Y[idxs]); opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(),1.0); opt.step(); step+=1
        if step%spe==0 or step==total:
            m.eval()
            with torch.no_grad(): va=(m(Xv).argmax(1)==Yv).float().mean().item()
            m.train(); print(f'step {step} val {va:.4f} t {time.time()-t0:.0f}s {step*bs/(time.time()-t0):.0f} img/s',flush=True)
m.eval()
with torch.no_grad(): print('test',(torch.cat([m(Xt[i:i+1000]).argmax(1) for i in range(0,10000,1000)])==Yt).float().mean().item())
